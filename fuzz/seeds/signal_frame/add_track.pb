"!
TR_videocam €
(Ð@JÀ´